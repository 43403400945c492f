"""Merchant side: local (DP) trainer, privacy ledger, Flower ClientApp, merchant daemon (next issues)."""
