"""The data team's path to a model: import history and outcomes, train, evaluate."""
