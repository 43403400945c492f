"""Merchant side: the local (DP) trainer, the privacy ledger, the Flower ClientApp and the merchant daemon."""
