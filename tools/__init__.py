"""Tools the task runner uses: the safe shell executor and the reward model."""
