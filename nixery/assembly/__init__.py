"""From a closure to an image: layer grouping, root file system, archives and manifests."""
