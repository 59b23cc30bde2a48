"""From a feature window to the state every data point carries: the classifier (model + debounce), early warning
on build-ups, and incident spans."""
