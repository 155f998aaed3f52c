"""dpo_ds: DeepSpeed-native Direct Preference Optimization."""

__version__ = "0.1.0"
