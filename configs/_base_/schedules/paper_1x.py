# The 1x schedule of the CBN paper's detection experiments (Yao et al., CVPR 2021; official code:
# Howal/Cross-iterationBatchNorm): 12 epochs, SGD lr 0.02 for 16 images per iteration, momentum 0.9,
# weight decay 1e-4, linear warm-up over 500 iterations from 0.001 x lr, lr x 0.1 after epochs 8 and 11,
# gradient clipping at an L2 norm of 35.
max_epochs = 12

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2))

# lr 0.02 is for 16 images per iteration (the paper: 4 GPUs x 4 images, train_dataloader.batch_size=4
# in the dataset bases). `global_batch_size` states that total: in a distributed run, cbn_mmdet's
# tools/train.py sets the per-GPU batch to global_batch_size / #GPUs (8 GPUs -> 2 images each) so the lr
# stays right. Note that BN-type layers (CBN here) normalise over the images of ONE GPU, so only 4 GPUs
# reproduce the paper's CBN rows exactly. auto_scale_lr is off so that the paper's lr is what runs;
# `--auto-scale-lr` rescales the lr instead for another total batch.
global_batch_size = 16
auto_scale_lr = dict(enable=False, base_batch_size=16)
