"""Records in, tensors out: reading and checking records files, decoding images under limits,
DICOM series folders, per-modality preprocessing, batches, and the cache of frozen encoder outputs."""
