"""Watches files, turns each change into a durable event with its diff."""
