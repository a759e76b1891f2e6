# 2x = the paper 1x schedule stretched to 24 epochs, lr x 0.1 after epochs 16 and 22 (mmdet's 2x).
# Everything else (SGD, lr 0.02 for 16 images, warm-up, clipping) is inherited from paper_1x.py.
_base_ = './paper_1x.py'

max_epochs = 24

train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[16, 22], gamma=0.1),
]
