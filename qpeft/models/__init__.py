"""Model resolution, layer selection and loading."""
