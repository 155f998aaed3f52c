"""The `dpo-ds` subcommands that only an operator runs (estimate, sweep, hostfile); training never imports them."""
