"""Data: tile tables from folders or manifests, tile stores, patient-level splits, transforms, stain jitter."""
