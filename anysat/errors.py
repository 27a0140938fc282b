"""Exceptions by meaning, so callers (CLI, flows) can catch what the user did wrong."""


class AnySatError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class RequestError(AnySatError, ValueError):
    """A region request is invalid (bbox, dates, sensors, patch or tile size)."""


class SpecError(AnySatError, ValueError):
    """A modality spec or provider file is missing or invalid."""


class UnknownCollectionError(SpecError):
    """A catalog has no collection of the id a modality spec names for it."""


class CatalogUnreachableError(AnySatError):
    """A STAC API could not be reached or kept failing (429/5xx) after retries."""


class NoItemsError(AnySatError):
    """A catalog search found nothing for a sensor in the requested region and dates."""


class OutputNotWritableError(AnySatError):
    """The output URI cannot be written."""


class CheckpointError(AnySatError):
    """A checkpoint is missing, corrupt or does not match its config."""


class ModelInputError(AnySatError, ValueError):
    """A model batch does not match the model (modalities, footprints, patch size, NaNs)."""


class TileReadError(AnySatError):
    """A tile's pixels could not be read (a missing, truncated or corrupt asset)."""


class TilesFailedError(AnySatError):
    """Some tiles of a run failed; the others are done and a rerun retries only these."""


class BlockReaderError(AnySatError):
    """The block reader processes failed: one died (killed, out of memory), or /dev/shm cannot
    hold the batches they hand back."""
