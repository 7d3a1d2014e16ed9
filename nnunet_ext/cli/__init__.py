"""The ``nnunet-ext`` command: one module per subcommand, each with ``add_parser`` and ``run``; ``options``
holds the argument definitions several subcommands share."""
