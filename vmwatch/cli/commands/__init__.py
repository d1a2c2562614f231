"""One module per `vmwatch` sub-command, discovered by name.

Each module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args, env) -> int``.
Keep module-level imports light: every command module is imported to build ``--help``.
"""
