"""data_prep: raw EEG recordings to LaBraM ArrayRecord shards (python -m data_prep)."""
