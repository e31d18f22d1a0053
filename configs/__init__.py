"""The shipped run configs (YAML, one folder per stage), installed as package data of ``dora_shapegen.configs``.

Found through ``importlib.resources`` (``dora_shapegen.config.CONFIG_DIR``), so they are there in a wheel install
as in a checkout. A path a user gives that exists is always used as given.
"""
