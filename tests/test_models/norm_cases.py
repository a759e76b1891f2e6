"""The norm configs every mmdet-level test runs through (one place, so a new norm joins all tests)."""
NORM_CFGS = {
    'CBN': dict(type='CBN', buffer_num=2, requires_grad=True),
    'SyncCBN': dict(type='SyncCBN', buffer_num=2, requires_grad=True),
    'SyncBN': dict(type='SyncBN', requires_grad=True),
    'GN': dict(type='GN', num_groups=8, requires_grad=True),
    'BCN': dict(type='BCN', num_groups=8, requires_grad=True),
    'MABN': dict(type='MABN', B=2, real_B=4, requires_grad=True),
}
BN_LIKE = ('CBN', 'SyncCBN', 'SyncBN', 'BCN', 'MABN')
