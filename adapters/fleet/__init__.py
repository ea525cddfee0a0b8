"""The server side of fleet updates: the bundle registry, fleet state and the rollout orchestrator."""
