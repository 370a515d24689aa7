"""The operator's .env turned into validated, frozen receiver settings.

``model`` the settings (the only module ``core/`` imports), ``parse`` the .env and each key, ``checks`` what
spans receivers, ``derive`` the effective settings no key states, ``host`` what is asked of the machine.

The public names are re-exported here on first use, not imported: ``core/`` imports ``config.model``, and
Python runs this file first, so an import here would load dotenv, socket and netlink into core.
"""
import importlib

_HOME = {name: module for module, names in {
    "model": ("STREAMS", "Mode", "Endpoint", "Listen", "ForwardingSettings", "Recording", "Limits", "TemplateLimits",
              "ReceiverConfig", "Console", "Config", "live_change_impossible"),
    "parse": ("DEFAULT_CONFIG_PATH", "DUMP_ROOT", "ConfigError", "resolve_path", "load", "load_text", "load_values",
              "key_lines", "receiver_params", "receiver_key"),
    "derive": ("auto_receivers",),
    "host": ("Host", "LocalHost"),
}.items() for name in names}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
