"""Model architectures by name: `model.arch` is a built-in or a user's "package.module:attr".

Built-ins are imported on first use, so naming one loads only its own modules."""

from __future__ import annotations

from embshard.config import ModelConfig
from embshard.errors import ConfigError
from embshard.trainer.models.arch import BuilderArch, ModelArch, TrainModel, build_model
from embshard.trainer.reference import call_text, callable_as, colon_hint, import_reference, instance_of

__all__ = ["ModelArch", "TrainModel", "build_model", "get_arch"]

_BUILTIN = {
    "dlrm": "embshard.trainer.models.dlrm:DlrmArch",
    "dlrm_dcn": "embshard.trainer.models.dcn:DlrmDcnArch",
    "two_tower": "embshard.trainer.models.two_tower:TwoTowerArch",
    "mf": "embshard.trainer.models.mf:MfArch",
    "fm": "embshard.trainer.models.fm:FmArch",
}


def get_arch(name: str | ModelConfig) -> ModelArch:
    """The arch `name` (or a model config's `arch`) names: a built-in, or a user's reference to a
    ModelArch (class or instance) or a plain builder function (`BuilderArch`)."""
    if isinstance(name, ModelConfig):
        name = name.arch
    if name in _BUILTIN:
        return _as_arch(import_reference(_BUILTIN[name], f"model.arch {name!r}"), name)
    if ":" not in name:
        raise ConfigError(f"model.arch: unknown architecture {name!r} (built-in: {', '.join(_BUILTIN)}; "
                          f"or a builder or ModelArch as package.module:attr){colon_hint(name)}")
    return _as_arch(import_reference(name, "model.arch"), name)


def _as_arch(found: object, name: str) -> ModelArch:
    if isinstance(found, type) and issubclass(found, ModelArch):
        found = instance_of(found, f"model.arch {name!r}")
    if isinstance(found, ModelArch):
        if type(found).build is ModelArch.build:  # else a NotImplementedError in every worker, as a "crash"
            raise ConfigError(f"model.arch {name!r}: {type(found).__name__} does not implement "
                              "build(embeddings, spec, cfg, device)")
        found.name = name
        return found
    if callable(found) and not isinstance(found, type):
        if not callable_as(found, 3):
            raise ConfigError(f"model.arch {name!r}: {call_text(found)} cannot be called as "
                              "build(embeddings, spec, options)")
        return BuilderArch(found, name)
    raise ConfigError(f"model.arch {name!r}: a {type(found).__name__}, neither a ModelArch nor a builder "
                      "function build(embeddings, spec, options) -> nn.Module")
