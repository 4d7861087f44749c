"""The three training stages: loss, metrics and step of each."""
