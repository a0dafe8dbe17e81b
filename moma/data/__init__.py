"""Data: tile tables from folders or manifests, patient-level splits, transforms, stain jitter."""
