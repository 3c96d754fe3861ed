"""Errors that llmsh raises for bad input; the CLI prints them as one line on stderr.

Every error a user can cause (missing or corrupt model files, unknown architectures, bad
options, input that does not fit) is a subclass of :class:`LlmshError`; anything else is a bug.
"""


class LlmshError(Exception):
    """Base class: a user-facing error whose message is one clear line."""

    exit_code = 1


class ConfigError(LlmshError):
    """config.json is missing, unreadable, lacks a required key, or names an unsupported model_type."""


class WeightsError(LlmshError):
    """Safetensors files are missing, truncated, corrupt, or do not match the config (names the tensor and file)."""


class TokenizerError(LlmshError):
    """No usable tokenizer in the model folder, or the tokenizer cannot be built."""


class TemplateError(LlmshError):
    """The chat template failed to render (including ``raise_exception`` from the template)."""


class ModelNotFoundError(LlmshError):
    """A model name or path resolves to nothing."""


class PullError(LlmshError):
    """A registry model could not be fetched (pip/network failure, checksum mismatch, missing extra)."""


class ConvertError(LlmshError):
    """A GGUF file cannot be converted (unsupported quantization, tokenizer or architecture)."""


class InputError(LlmshError):
    """User input is unusable: empty, invalid UTF-8, or too long for the context."""
