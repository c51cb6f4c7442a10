"""Training building blocks per stage: losses, discriminators, train states and steps (see DESIGN.md)."""
