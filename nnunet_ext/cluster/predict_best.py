"""Predict with what ``nnUNetv2_find_best_configuration`` chose: the workflow's predict step.

Which model (or ensemble of two) wins is only known once cross-validation has run, so the batch
script cannot name it. nnU-Net writes its choice to ``$nnUNet_results/<dataset>/inference_information.json``;
this module reads it and runs the stock commands that nnU-Net prints in ``inference_instructions.txt``:
``nnUNetv2_predict`` per member (``--save_probabilities`` for an ensemble; 3d_lowres first for the
cascade), ``nnUNetv2_ensemble``, then ``nnUNetv2_apply_postprocessing`` into the output folder.
Intermediate folders go next to it (``<output>_parts/``), so the output holds only the final
predictions (what ``nnunet-ext submit`` reads).

    python -m nnunet_ext.cluster.predict_best -d 17 -i imagesTs -o predictions [-device cuda] [-np 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from nnunet_ext.errors import UserFacingError


def inference_commands(info: dict, input_folder: str, output_folder: str, results_dataset: Path,
                       device: str = "cuda", num_processes: int = 8) -> list[list[str]]:
    """The stock commands for nnU-Net's ``inference_information.json``, final output in ``output_folder``."""
    best = info["best_model_or_ensemble"]
    members = best["selected_model_or_models"]
    folds = [str(f) for f in info["folds"]]
    dataset = str(info["dataset_name_or_id"])
    parts = Path(f"{output_folder.rstrip(os.sep)}_parts")
    ensemble = len(members) > 1
    commands, member_outputs = [], []
    for index, member in enumerate(members, start=1):
        trainer, configuration, plans = member["trainer"], member["configuration"], member["plans_identifier"]
        target = parts / f"model_{index}_{trainer}__{plans}__{configuration}"

        # called only within this iteration, so the loop variables it reads are this member's
        def predict(config: str, out: Path, previous: Path | None = None, probabilities: bool = False) -> list[str]:
            command = ["nnUNetv2_predict", "-d", dataset, "-i", input_folder, "-o", str(out), "-f", *folds,
                       "-tr", trainer, "-c", config, "-p", plans,  # noqa: B023
                       "-device", device, "--disable_progress_bar"]
            if previous is not None:
                command += ["-prev_stage_predictions", str(previous)]
            return command + (["--save_probabilities"] if probabilities else [])

        previous_stage = _previous_stage(results_dataset / f"{trainer}__{plans}__{configuration}", configuration)
        previous_output = None
        if previous_stage is not None:
            previous_output = parts / f"model_{index}_{trainer}__{plans}__{previous_stage}"
            commands.append(predict(previous_stage, previous_output))
        commands.append(predict(configuration, target, previous_output, probabilities=ensemble))
        member_outputs.append(target)
    if ensemble:
        merged = parts / "ensemble"
        commands.append(["nnUNetv2_ensemble", "-i", *map(str, member_outputs), "-o", str(merged),
                         "-np", str(num_processes)])
    else:
        merged = member_outputs[0]
    commands.append(["nnUNetv2_apply_postprocessing", "-i", str(merged), "-o", output_folder,
                     "-pp_pkl_file", best["postprocessing_file"], "-np", str(num_processes),
                     "-plans_json", best["some_plans_file"]])
    return commands


def _previous_stage(model_folder: Path, configuration: str) -> str | None:
    plans_file = model_folder / "plans.json"
    if not plans_file.is_file():
        return None
    configurations = json.loads(plans_file.read_text()).get("configurations", {})
    return configurations.get(configuration, {}).get("previous_stage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_ext.cluster.predict_best", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-i", required=True, help="input images (nnU-Net naming, e.g. imagesTs)")
    parser.add_argument("-o", required=True, help="output folder of the final (postprocessed) predictions")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"))
    parser.add_argument("-np", type=int, default=8, help="processes for ensembling and postprocessing")
    args = parser.parse_args(argv)
    try:
        from nnunet_ext import compat

        results = os.environ.get("nnUNet_results")
        if not results:
            raise UserFacingError("nnUNet_results is not set.")
        dataset_folder = Path(results) / compat.dataset_name(int(args.d) if args.d.isdigit() else args.d)
        info_file = dataset_folder / "inference_information.json"
        if not info_file.is_file():
            raise UserFacingError(f"{info_file} is missing: run nnUNetv2_find_best_configuration first "
                                  f"(the workflow's find_best step).")
        commands = inference_commands(json.loads(info_file.read_text()), os.path.abspath(args.i),
                                      os.path.abspath(args.o), dataset_folder, args.device, args.np)
    except UserFacingError as error:
        print(f"predict_best: error: {error}", file=sys.stderr)
        return 2
    for command in commands:
        print("+ " + shlex.join(command), flush=True)  # what to paste to run it again by hand
        status = subprocess.run(command).returncode
        if status != 0:
            print(f"predict_best: `{command[0]}` failed with exit status {status}", file=sys.stderr)
            return status
    print(f"Predictions of the best model: {args.o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
