"""Inference: the forward pass over batches, and streamed, resumable prediction over files of any length."""
