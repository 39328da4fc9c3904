"""Using a trained dictionary with its model: which features fire on a text and what the
dictionary leaves unexplained there (``interp.observe``).

Runs without Ray: a dictionary folder (ours, or one SAELens wrote) and a Hugging Face causal LM.
May import ``trainer`` and ``activation_cache``; never ``cluster`` or ``ray``.
"""
