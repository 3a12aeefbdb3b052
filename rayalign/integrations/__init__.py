"""Other frameworks rayalign hands work to: OpenRLHF (its DPO trainer and its reward-function files)."""
