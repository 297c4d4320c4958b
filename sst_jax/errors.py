"""Errors a user can act on. Every message names the file, key or module involved."""


class SstJaxError(Exception):
    """Base class of sst-jax errors."""


class CheckpointError(SstJaxError):
    """A model checkpoint is missing, corrupt, or does not match the expected architecture."""


class AdapterError(SstJaxError):
    """A LoRA adapter file or config is missing, corrupt or uses an unsupported feature."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit a base model or another adapter (modules, shapes, base id)."""


class NumericalError(SstJaxError):
    """NaN/Inf in inputs or a matrix that is not positive definite even after damping."""


class DatasetError(SstJaxError):
    """A dataset is missing, has the wrong schema, or needs a network we do not have."""


class HyperParameterError(SstJaxError, ValueError):
    """An unknown merge method, an unknown hyper-parameter name or a value of the wrong type."""


class TokenizerError(CheckpointError):
    """A checkpoint's tokenizer is missing or broken (e.g. it encodes every text to [])."""


class PermissionDeniedError(SstJaxError):
    """A file or folder exists but this process is not allowed to read or write it."""


class OutputError(SstJaxError):
    """An output folder or file cannot be written safely (e.g. it would replace unrelated files)."""
