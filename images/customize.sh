# Runs with /bin/sh inside the guest tree (chroot), after images/rootfs/ is copied over it.
set -eu

# systemd: networkd and sshd on, the seed reader before them; on a locked master (gcvm.locked=1)
# sshd and gettys stay off and the code disk and the job agent start instead; nothing that waits
# for the network or wakes up later to use the CPU.
systemctl enable systemd-networkd.service ssh.service gcvm-seed.service gcvm-code.service \
    gcvm-agent.service
systemctl mask systemd-networkd-wait-online.service getty@tty1.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
# Early-boot work a VM does not need; under TCG each costs seconds of the one vCPU while the
# boot waits for networkd. The modules still load on demand (/dev/fuse, /dev/loop-control, ...).
systemctl mask modprobe@drm.service modprobe@dm_mod.service modprobe@efi_pstore.service \
    modprobe@fuse.service modprobe@loop.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount sys-fs-fuse-connections.mount

# Every VM gets its own host key from its seed; none is baked into the image.
rm -f /etc/ssh/ssh_host_*

echo gcvm > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tgcvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > /etc/hosts
# The root is mounted by the initrd: the read-only, dm-verity-checked disk under an overlay whose
# upper layer is a tmpfs. Nothing for systemd to mount or remount; no swap.
echo '# / is an overlay made by the initrd (gcvm-verity, gcvm-overlay); no swap' > /etc/fstab
# The host's resolver means nothing in the guest; the seed writes one when it names DNS servers.
rm -f /etc/resolv.conf
: > /etc/resolv.conf
# Empty machine-id: each VM generates its own on first boot (DHCP client ids derive from it).
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/cache/debconf/*-old
