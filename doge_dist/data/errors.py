"""The one exception type for bad data, tokenizer or blend input."""


class DataError(ValueError):
    """Input the data pipeline cannot use; the message names the file (and line), the problem and the fix."""
