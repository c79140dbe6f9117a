"""Test credentials shared by the simulator and the daemon (never real ones)."""

CREDS = {
    "TWITTER_CONSUMER_KEY": "xvz1evFS4wEEPTGEFPHBog",
    "TWITTER_CONSUMER_SECRET": "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
    "TWITTER_ACCESS_TOKEN": "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
    "TWITTER_ACCESS_TOKEN_SECRET": "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE",
}
