"""Products written to object storage: the embedding layer, previews, run manifests."""

from .preview import write_pca_preview
from .zarr_layer import LayerGrid, create_layer, embeddings, read_layer, write_tile

__all__ = ["LayerGrid", "create_layer", "embeddings", "read_layer", "write_pca_preview",
           "write_tile"]
