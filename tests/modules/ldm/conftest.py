import pytest
import torch

TINY_VAE = dict(block_out_channels=(8, 8, 8), latent_channels=4)


@pytest.fixture(scope="session")
def tiny_vae_ckpt(tmp_path_factory):
    """A SpatialVAEModule checkpoint made the way the stage makes one (export_path after a fit that ends
    on a validation), trained briefly on 512 digits: the autoencoder of the latent-diffusion tests."""
    from datamodules.mnist import MNISTDataModule
    from modules.ldm.autoencoder_module import SpatialVAEModule
    from tests.helpers import quiet_trainer

    path = tmp_path_factory.mktemp("vae") / "vae.ckpt"
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=60, limit_val_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=None,
                            val_check_interval=60, default_root_dir=path.parent)
    module = SpatialVAEModule(**TINY_VAE, lr=5e-3, export_path=str(path))
    trainer.fit(module, datamodule=MNISTDataModule(batch_size=32, train_limit=512))
    return str(path)
