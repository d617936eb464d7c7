"""An update round for the trainer tests: republish the current policy weights as a new
version (the learning itself is not what these tests are about)."""

from __future__ import annotations


def factory(args):
    def update(core):
        from palm_rlhf.checkpoint import load_checkpoint

        current = core.policy_store.current()
        state, manifest = load_checkpoint(core.policy_store.path(current))
        version = core.publish(state, manifest["config"], parent=current)
        return version, {"loss": 0.25, "kl": 0.01, "message": f"published {version}"}

    return update
