"""Training recipes that reproduce the models shipped inside the package (`digits`)."""
