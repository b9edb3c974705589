"""Agents that steer Gremlin from its own history: the planner of training specs and task priorities."""
