"""ClassSAMTrainer: 2d only, settings in the plans, optimiser over the trainable parts, SAM checkpoint
handling (never over -pretrained_weights), official conventions only on rgb_to_0_1 plans, training
in-process with and without the embedding cache (miss, hit, stale), resuming with ``--c``, and the
stock pipeline (slow) - all with a tiny random SAM and a checkpoint the test writes itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from class_sam_support import write_tiny_sam_checkpoint
from planned_roots import nnunet_environment
from nnunet_ext import compat
from nnunet_ext.architectures.class_sam import ClassSAM, SamCheckpointError
from nnunet_ext.embedding_cache import EmbeddingCacheError, case_tiles
from nnunet_ext.testing.harness import NnUNetRoot, check_pipeline_outputs, load_trainer, run_stock_pipeline
from nnunet_ext.pretrained import load_pretrained_weights
from nnunet_ext.trainers.class_sam import (CLASS_SAM_PLANS_KEY, RGB_NORMALIZATION, ClassSAMError, ClassSAMTrainer,
                                           default_network_settings, official_input_problem)

TRAINER = "ClassSAMTrainer"


@pytest.fixture(scope="module")
def root_2d(nnunet_root) -> NnUNetRoot:
    """The session's harness root with its 2d configuration preprocessed as well (in-process, seconds)."""
    if not (nnunet_root.preprocessed / nnunet_root.dataset_name / "nnUNetPlans_2d").is_dir():
        with nnunet_environment(nnunet_root):
            compat.preprocess(nnunet_root.dataset_id, "nnUNetPlans", ["2d"], 0)
    return nnunet_root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")


@pytest.fixture
def tiny_env(monkeypatch, checkpoint):
    """Tiny SAM, its checkpoint, no augmentation workers, one thread (see test_class_sam.one_thread)."""
    for variable in ("NNUNET_EXT_SAM_CACHE", "NNUNET_EXT_SAM_RANDOM_INIT", "NNUNET_EXT_SAM_CACHE_REBUILD"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NNUNET_EXT_SAM_MODEL_TYPE", "tiny")
    monkeypatch.setenv("NNUNET_EXT_SAM_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield monkeypatch
    torch.set_num_threads(threads)


def trainer_for(root, monkeypatch, results, configuration: str = "2d", continue_training: bool = False):
    return load_trainer(root, ClassSAMTrainer, monkeypatch, results, configuration=configuration,
                        continue_training=continue_training)


def log_text(trainer) -> str:
    with open(trainer.log_file) as file:
        return file.read()


def test_refuses_configurations_that_are_not_2d(root_2d, tiny_env, tmp_path):
    with pytest.raises(ClassSAMError, match=r"2d configuration; '3d_fullres' has a 3D patch.*nnUNetv2_train DATASET "
                                            r"2d FOLD -tr ClassSAMTrainer"):
        trainer_for(root_2d, tiny_env, tmp_path, configuration="3d_fullres")


def test_network_settings_go_into_the_plans_and_the_schedule_is_the_official_one(root_2d, tiny_env, tmp_path):
    trainer = trainer_for(root_2d, tiny_env, tmp_path)
    settings = trainer.plans_manager.plans[CLASS_SAM_PLANS_KEY]
    assert settings == {"sam_model_type": "tiny", "num_tokens": 2, "hidden_dim_dense": 128, "hidden_dim_sparse": 128,
                        "channel_indices": None, "intensity_range": 3.0}
    assert (trainer.initial_lr, trainer.weight_decay, trainer.num_epochs) == (1e-3, 1e-4, 500)
    assert trainer.grad_clip is None  # official: no gradient clipping
    assert trainer.enable_deep_supervision is False and trainer._get_deep_supervision_scales() is None
    tiny_env.delenv("NNUNET_EXT_SAM_MODEL_TYPE")
    assert default_network_settings()["sam_model_type"] == "vit_h"  # the paper's default
    # what nnU-Net's predictor does with the model folder's plans: the network named there, no variable needed
    network = ClassSAMTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, False)
    assert isinstance(network, ClassSAM) and network.sam_model_type == "tiny" and network.channel_indices == (0, 0, 0)
    tiny_env.setenv("NNUNET_EXT_SAM_MODEL_TYPE", "vit_q")
    with pytest.raises(Exception, match="Unknown SAM model type 'vit_q'"):
        trainer_for(root_2d, tiny_env, tmp_path / "other")


def test_optimiser_holds_exactly_the_trainable_parameters(root_2d, tiny_env, tmp_path):
    trainer = trainer_for(root_2d, tiny_env, tmp_path)
    trainer.initialize()
    network = trainer.class_sam()
    in_optimiser = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimiser == {id(p) for p in network.parameters() if p.requires_grad}
    assert not in_optimiser & {id(p) for p in network.image_encoder.parameters()}
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (1e-3, 1e-4)
    for epoch in (0, 7, 499):
        trainer.lr_scheduler.step(epoch)
        assert trainer.optimizer.param_groups[0]["lr"] == 1e-3  # constant, as the official code
    counts = network.parameter_counts()
    assert f"{counts['trainable']:,} trainable of {counts['total']:,} parameters" in log_text(trainer)


def test_training_needs_a_checkpoint_unless_random_weights_are_asked_for(root_2d, tiny_env, tmp_path):
    tiny_env.delenv("NNUNET_EXT_SAM_CHECKPOINT")
    trainer = trainer_for(root_2d, tiny_env, tmp_path)
    trainer.initialize()
    with pytest.raises(SamCheckpointError, match="set NNUNET_EXT_SAM_CHECKPOINT to an official SAM tiny checkpoint"):
        trainer.load_sam_weights()
    tiny_env.setenv("NNUNET_EXT_SAM_RANDOM_INIT", "1")
    trainer.load_sam_weights()
    assert "RANDOM SAM weights" in log_text(trainer)
    tiny_env.delenv("NNUNET_EXT_SAM_RANDOM_INIT")
    (tmp_path / "broken.pth").write_bytes(b"\x00" * 100)
    tiny_env.setenv("NNUNET_EXT_SAM_CHECKPOINT", str(tmp_path / "broken.pth"))
    with pytest.raises(SamCheckpointError, match="broken.pth could not be read"):
        trainer.load_sam_weights()


def _encoder_equals_checkpoint(network: ClassSAM, checkpoint) -> bool:
    state = torch.load(checkpoint, weights_only=True)
    return all(torch.equal(v, state[f"image_encoder.{k}"]) for k, v in network.image_encoder.state_dict().items())


def test_pretrained_weights_are_not_overwritten_by_the_sam_checkpoint(root_2d, tiny_env, tmp_path, checkpoint):
    """``nnUNetv2_train ... -pretrained_weights FILE`` (e.g. SurgicalSAM's weights from import-weights):
    nnU-Net loads the file after initialize(); training then starts from it, the SAM checkpoint unread."""
    trainer = trainer_for(root_2d, tiny_env, tmp_path)
    trainer.initialize()
    weights = {key: value + 0.5 if value.is_floating_point() else value
               for key, value in trainer.class_sam().state_dict().items()}
    path = tmp_path / "pretrained.pth"
    torch.save({"network_weights": weights}, path)
    load_pretrained_weights(trainer.network, path)
    trainer.on_train_start()
    state = trainer.class_sam().state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())
    assert not _encoder_equals_checkpoint(trainer.class_sam(), checkpoint)
    assert f"starts from the pretrained weights {path}" in log_text(trainer)
    assert trainer.method_state()["class_sam"]["sam_checkpoint"] == {"path": None, "model_type": "tiny",
                                                                     "pretrained_weights": str(path)}
    trainer.on_train_end()


def _trainer_with_plans(root, monkeypatch, results, plans: dict) -> ClassSAMTrainer:
    for variable, folder in [("nnUNet_raw", root.raw), ("nnUNet_preprocessed", root.preprocessed),
                             ("nnUNet_results", results)]:
        monkeypatch.setenv(variable, str(folder))
    return compat.instantiate_trainer(ClassSAMTrainer, plans, "2d", 0, _dataset_json(root), torch.device("cpu"))


def _plans(root) -> dict:
    return json.loads((root.preprocessed / root.dataset_name / "nnUNetPlans.json").read_text())


def _dataset_json(root) -> dict:
    return json.loads((root.preprocessed / root.dataset_name / "dataset.json").read_text())


def test_official_conventions_need_rgb_to_0_1_channels(root_2d, tiny_env, tmp_path):
    """SurgicalSAM's preprocessing reads the uint8 frame back as round(255 x): right only for nnU-Net's
    rgb_to_0_1 normalisation. Other plans are refused in one line, when training starts and when the
    network is built from a model folder's plans; rgb_to_0_1 plans build the official network."""
    plans = _plans(root_2d)
    plans[CLASS_SAM_PLANS_KEY] = {**default_network_settings(), "conventions": "official"}
    schemes = plans["configurations"]["2d"]["normalization_schemes"]
    assert RGB_NORMALIZATION not in schemes and len(schemes) == 1
    plans_file = root_2d.preprocessed / root_2d.dataset_name / "nnUNetPlans.json"
    with pytest.raises(ClassSAMError) as error:
        _trainer_with_plans(root_2d, tiny_env, tmp_path, plans)
    message = str(error.value)
    assert message.startswith(f"{plans_file}: ClassSAM's official conventions") and "\n" not in message
    for needle in (f"configuration '2d' normalises the channels SAM sees otherwise (channel 0: {schemes[0]})",
                   "Name those channels 'rgb_to_0_1' in dataset.json's channel_names and plan and preprocess again",
                   '"conventions": "official"'):
        assert needle in message
    with pytest.raises(ClassSAMError, match=f"plans 'nnUNetPlans' of {root_2d.dataset_name}: ClassSAM's official"):
        compat.network_as_trainer_builds_it(ClassSAMTrainer, plans, _dataset_json(root_2d), "2d", meta=True)
    plans["configurations"]["2d"]["normalization_schemes"] = [RGB_NORMALIZATION]
    trainer = _trainer_with_plans(root_2d, tiny_env, tmp_path, plans)
    network = ClassSAMTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, False)
    assert network.conventions == "official"


def test_only_the_channels_sam_sees_need_rgb_to_0_1():
    official, rgb = {"conventions": "official"}, RGB_NORMALIZATION
    assert official_input_problem({}, ["ZScoreNormalization"]) is None  # the default conventions take any input
    assert official_input_problem(official, [rgb, rgb, rgb, "ZScoreNormalization"]) is None  # channel 3 unseen
    problem = official_input_problem({**official, "channel_indices": [0, 1, 3]}, [rgb, rgb, rgb, "CTNormalization"])
    assert "(channel 3: CTNormalization)" in problem and "the configuration normalises" in problem
    assert "channel 0: RescaleTo01Normalization" in official_input_problem(official, ["RescaleTo01Normalization"])


def test_training_live_and_from_the_embedding_cache_and_resuming(root_2d, tiny_env, tmp_path, checkpoint):
    # live: nnU-Net's augmented patches through the frozen encoder
    live = trainer_for(root_2d, tiny_env, tmp_path / "live")
    live.on_train_start()
    network = live.class_sam()
    assert _encoder_equals_checkpoint(network, checkpoint)
    prototypes = network.prototypes.detach().clone()
    assert np.isfinite(live.train_step(next(live.dataloader_train))["loss"])
    assert _encoder_equals_checkpoint(network, checkpoint)  # frozen
    assert not torch.equal(network.prototypes, prototypes)  # trained
    assert live.inference_allowed_mirroring_axes == (0, 1)  # nnU-Net's 2d mirroring
    validation = live.validation_step(next(live.dataloader_val))
    assert validation["tp_hard"].shape == (live.label_manager.num_segmentation_heads - 1,)
    live.on_train_end()

    # cached: a miss builds the cache, batches come from it
    cache_root = tmp_path / "cache"
    tiny_env.setenv("NNUNET_EXT_SAM_CACHE", str(cache_root))
    tiny_env.setenv("NNUNET_EXT_SAM_CACHE_VERSIONS", "2")
    cached = trainer_for(root_2d, tiny_env, tmp_path / "cached")
    cached.on_train_start()
    training_cases = list(cached.do_split()[0])
    assert f"0 case(s) cached, {len(training_cases)} to compute" in log_text(cached)
    batch = next(cached.dataloader_train)
    assert set(batch) == {"embeddings", "target", "keys"}
    assert np.isfinite(cached.train_step(batch)["loss"])
    assert cached.inference_allowed_mirroring_axes == (1,)  # training saw left-right mirrored copies only
    cache = cached.embedding_cache()
    embeddings, targets, _ = cache.read_case(training_cases[0])
    dataset = cached.dataset_class(cached.preprocessed_dataset_folder, training_cases[:1])
    images, expected_targets = case_tiles(*compat.load_preprocessed_case(dataset, training_cases[0]),
                                          cached.configuration_manager.patch_size, versions=2)
    with torch.no_grad():  # the cached embedding is the one the live network computes (stored as float16)
        live_embeddings = cached.class_sam().encode(torch.from_numpy(images[:3])).numpy()
    np.testing.assert_allclose(embeddings[:3], live_embeddings, atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(targets, expected_targets)
    cached.save_checkpoint(str(tmp_path / "cached_checkpoint.pth"))
    cached.on_train_end()

    # hit: nothing computed again
    again = trainer_for(root_2d, tiny_env, tmp_path / "again")
    again.on_train_start()
    assert f"{len(training_cases)} case(s) cached, 0 to compute, 0 stale" in log_text(again)
    again.on_train_end()

    # damaged: a truncated embedding file is refused naming it; the rebuild switch computes that case again
    damaged = cache.folder / f"{training_cases[0]}.emb.npy"
    content = damaged.read_bytes()
    damaged.unlink()  # a new file: earlier trainers still map the old one
    damaged.write_bytes(content[:-10])
    with pytest.raises(EmbeddingCacheError, match=rf"{damaged.name} is damaged \(truncated.*Delete .*"
                                                  rf"{training_cases[0]}\.json.*NNUNET_EXT_SAM_CACHE_REBUILD=1"):
        trainer_for(root_2d, tiny_env, tmp_path / "damaged").on_train_start()
    tiny_env.setenv("NNUNET_EXT_SAM_CACHE_REBUILD", "1")
    rebuilt = trainer_for(root_2d, tiny_env, tmp_path / "rebuilt")
    rebuilt.on_train_start()
    assert f"{len(training_cases) - 1} case(s) cached, 0 to compute, 1 stale to recompute" in log_text(rebuilt)
    rebuilt.on_train_end()
    tiny_env.delenv("NNUNET_EXT_SAM_CACHE_REBUILD")

    # --c: weights and cache settings come from the checkpoint; no SAM checkpoint needed
    for variable in ("NNUNET_EXT_SAM_CACHE", "NNUNET_EXT_SAM_CACHE_VERSIONS", "NNUNET_EXT_SAM_CHECKPOINT"):
        tiny_env.delenv(variable)
    resumed = trainer_for(root_2d, tiny_env, tmp_path / "cached", continue_training=True)
    resumed.load_checkpoint(str(tmp_path / "cached_checkpoint.pth"))
    assert resumed.cache_settings == cached.cache_settings and resumed.cache_settings.versions == 2
    resumed.on_train_start()
    assert torch.equal(resumed.class_sam().prototypes, cached.class_sam().prototypes)
    assert isinstance(next(resumed.dataloader_train)["embeddings"], torch.Tensor)
    resumed.on_train_end()
    tiny_env.setenv("NNUNET_EXT_SAM_MODEL_TYPE", "vit_b")
    with pytest.raises(ClassSAMError, match="trained with ClassSAM .*'tiny'.*NNUNET_EXT_SAM_MODEL_TYPE"):
        trainer_for(root_2d, tiny_env, tmp_path / "cached", continue_training=True).load_checkpoint(
            str(tmp_path / "cached_checkpoint.pth"))
    tiny_env.setenv("NNUNET_EXT_SAM_MODEL_TYPE", "tiny")

    # stale: another SAM checkpoint means other embeddings
    tiny_env.setenv("NNUNET_EXT_SAM_CACHE", str(cache_root))
    tiny_env.setenv("NNUNET_EXT_SAM_CACHE_VERSIONS", "2")
    tiny_env.setenv("NNUNET_EXT_SAM_CHECKPOINT", str(write_tiny_sam_checkpoint(tmp_path / "other.pth", seed=7)))
    stale = trainer_for(root_2d, tiny_env, tmp_path / "stale")
    with pytest.raises(EmbeddingCacheError, match="stale: it was built for another encoder.*encoder_weights_sha256.*"
                                                  "NNUNET_EXT_SAM_CACHE_REBUILD=1"):
        stale.on_train_start()


@pytest.mark.slow
def test_stock_pipeline_with_a_tiny_sam_and_the_embedding_cache(root_2d, checkpoint, tmp_path):
    """plan/preprocess (2d), nnUNetv2_train -tr ClassSAMTrainer on the CPU (1 epoch x 2 iterations, from the
    embedding cache), final validation, nnUNetv2_predict (slice by slice), nnUNetv2_evaluate_folder."""
    env = {"NNUNET_EXT_SAM_MODEL_TYPE": "tiny", "NNUNET_EXT_SAM_CHECKPOINT": str(checkpoint),
           "NNUNET_EXT_SAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = run_stock_pipeline(root_2d, TRAINER, configuration="2d", extra_env=env)
    check_pipeline_outputs(root_2d, result)
    plans = json.loads((result.model_folder / "plans.json").read_text())
    assert plans[CLASS_SAM_PLANS_KEY]["sam_model_type"] == "tiny"  # prediction rebuilt the network from it
    assert "trainable of" in result.train_output and "to compute" in result.train_output
    weights = compat.read_checkpoint(result.fold_folder / "checkpoint_final.pth")["network_weights"]
    sam = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in sam.items() if k.startswith("image_encoder."))  # frozen
    assert any(not torch.equal(weights[k], v) for k, v in sam.items() if k.startswith("mask_decoder.transformer"))
