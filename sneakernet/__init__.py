"""Sneakernet media: self-validating lookaside sources on USB keys and directories."""
