"""Library-like pieces of the recurrent-network tour (``examples/recurrent_neural_networks.py``).

``data``: Tiny Shakespeare speeches labelled by speaker, and dates in human formats with
their ISO 8601 form. ``nets``: padding and packing helpers, recurrent initialisation,
the speaker classifier, the attention encoder-decoder, batched beam search and a
time-budgeted training loop. Every recurrent core is an rnnfast layer or cell.
"""
