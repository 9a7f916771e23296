"""fedclip on Flower: the same learners, strategies and YAML configs, with every client on a
Flower node (a SuperNode of its own organisation, or a simulated one).

- `fedclip.flower.server:app`, the ServerApp: reads the fedclip config, asks the nodes for
  what it needs to know of their clients, then runs fedclip's one round loop (`RoundLoop`)
  with the `FlowerExecutor` (fedclip.flower.executor): each client's turn is done by its
  node; checkpoints, resume, W&B and upload checks are those of `fedclip fit`.
- `fedclip.flower.client:app`, the ClientApp: builds its one client from the config the
  server sends and its node config (`client-id`, optional `data-root`), and runs the same
  `ClientRuntime` as `fedclip fit` for it. Its personal state is kept on the node and sent
  back with every reply, for the server's checkpoint.
- `fedclip.flower.SiteData`: the partitioner for sites that bring their own data.

The Flower App folder is `flower_app/` at the repository root; the README's Flower section
shows `flwr run` for simulation and the SuperLink / SuperNode deployment. Needs the
`fedclip[flower]` extra (flwr); this module itself imports without it.
"""

from fedclip.flower.partition import SiteData

__all__ = ["SiteData"]
