"""Products written to object storage: the embedding layer (Zarr, float32 or int8), COGs,
GeoParquet vectors, previews and maps (`maps`)."""

from .zarr_layer import LayerGrid, LayerWriter, create_layer, embeddings, read_layer, write_tile

__all__ = ["LayerGrid", "LayerWriter", "create_layer", "embeddings", "read_layer", "write_tile"]
