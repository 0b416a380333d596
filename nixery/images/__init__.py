"""The image service: builds images through the pipeline and serves them from storage."""
