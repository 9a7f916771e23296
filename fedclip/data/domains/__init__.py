"""Multi-domain image data sets, for domain shift among clients and leave-one-domain-out.

Each is a `DatasetSource` whose samples also carry a domain: `domain_names` lists the domains
used (index = domain id) and `domains(split)` gives every sample's domain id, aligned with
`labels(split)`; the domain partitioners (`ByDomain`, `DomainDirichlet`, `LeaveOneDomainOut`)
read both. Every data set is read from its published folder layout under `root`:

- `DomainNet`: root/domainnet/<domain>/<class>/*.jpg and the official lists
  root/domainnet/<domain>_{train,test}.txt; 6 domains, 345 classes (10 by default).
- `OfficeCaltech10`: root/office_caltech_10/<domain>/<class>/*.jpg; 4 domains, 10 classes.
- `PACS`: root/pacs/<domain>/<class>/*.jpg, with the official lists
  root/pacs/splits/<domain>_{train,test}_kfold.txt when present; 4 domains, 7 classes.
- `OfficeHome`: root/office_home/<Domain>/<Class>/*.jpg; 4 domains, 65 classes.
- `VLCS`: root/VLCS/<Domain>/<class>/*.jpg (DomainBed); 4 domains, 5 classes.
- `TerraIncognita`: root/terra_incognita/<location>/<class>/*.jpg (DomainBed); 4 domains,
  10 classes.

Where a data set publishes no train/test split, each domain is split 80/20, stratified by
class with seed 0, and the split is saved as JSON next to the data (`files.seeded_split`).

Labels are global: one class list for all the domains used, a class missing from a domain
simply has no samples there. Class order follows label ids: those of the split files where
there are any, else the sorted class folder names; a split file whose label ids disagree with
the class folders of its images is an error, so an image's label is always its folder's.
"""

from fedclip.data.domains.base import DomainFolders
from fedclip.data.domains.sets import (
    FEDBN10,
    PACS,
    VLCS,
    DomainNet,
    OfficeCaltech10,
    OfficeHome,
    TerraIncognita,
)

__all__ = [
    "FEDBN10",
    "PACS",
    "VLCS",
    "DomainFolders",
    "DomainNet",
    "OfficeCaltech10",
    "OfficeHome",
    "TerraIncognita",
]
