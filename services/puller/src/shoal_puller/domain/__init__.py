"""Domain logic of the puller: pulling images, removing them, garbage collection."""
