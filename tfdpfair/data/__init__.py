"""tfdpfair.data: index-addressable datasets for Poisson-sampled DP-SGD, with demographics.

Modules (imported explicitly; this package imports nothing heavy on its own):
  sources       IndexedSource interface (get / get_batch / batches / sequential), ImageConfig,
                ArraySource (in-memory arrays), ImageFileSource (image files + labels + groups)
  tables        bad-input policy (on_bad="error" | "skip", LoadReport), patient-level splits
  image_check   every image file decoded once before training (JPEG/PNG, complete, channels)
  demographics  sex / age / race / insurance binning (CheXclusion convention)
  tfds          imagenet2012, places365_small, cifar10, cifar100, mnist via tensorflow_datasets:
                TfdsDataSource (random access on disk through tfds.data_source / ArrayRecord;
                CPU/GPU hosts), in-memory ArraySource (also TPU), tfds_source(name, split, ...)
  chexpert      CheXpert v1.0(-small): uncertainty policies, race from CHEXPERT DEMO.xlsx
  mimic_cxr     MIMIC-CXR-JPG + MIMIC-IV patients/admissions
  augment       augmentation multiplicity: make_views, multiview_loss_fn
  demo          built-in scikit-learn digits demo data
See docs/data.md.
"""
