"""The rules of instances and what they are made of."""
