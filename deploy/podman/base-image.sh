#!/bin/sh
# base-image.sh IMAGE [MIRROR]: make IMAGE, a Python 3.11 base image, from Debian bookworm's
# packages with mmdebstrap (no registry needed); `make base-image` calls it.
#
# Debian 12's python3 (3.11), laid out like the python:3.11-slim-bookworm image deploy/Dockerfile
# expects: pip installed into /usr/local from Debian's own pip wheel (so `pip install` and
# `pip uninstall pip` behave as there), no EXTERNALLY-MANAGED marker.  The image trusts the CAs
# this machine added under /usr/local/share/ca-certificates, so pip works inside builds behind a
# TLS-inspecting proxy.
set -eu
image=$1
mirror=${2:-http://deb.debian.org/debian}
podman=${PODMAN:-podman}
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT

# usrmerge (and the perl it needs; perl-base stays) only converts a non-merged /usr, which this
# image never was: usr-is-merged stands in for it.
# The dpkg excludes of Debian's slim images (no documentation, manuals or translations), kept in
# the image's dpkg config so that packages installed later are slim too.
mmdebstrap --quiet --variant=minbase --include=usr-is-merged,python3,python3-pip-whl,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/groff/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do if [ -e "$c" ]; then cp "$c" "$1/usr/local/share/ca-certificates/"; fi; done' \
  --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1' \
  --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
  --customize-hook='set -- "$1" "$1"/usr/share/python-wheels/pip-*.whl; wheel=${2#"$1"}; chroot "$1" python3 "$wheel/pip" install -q --root-user-action=ignore --no-index --no-cache-dir "$wheel"' \
  --customize-hook='chroot "$1" apt-get purge -y -qq python3-pip-whl >/dev/null' \
  --customize-hook='chroot "$1" apt-get purge -y -qq usrmerge perl libperl5.36 perl-modules-5.36 \
      libfile-find-rule-perl libnumber-compare-perl libtext-glob-perl >/dev/null' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$tar" "deb $mirror bookworm main" "deb $mirror-security bookworm-security main"

$podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tar" "$image" >/dev/null
echo "$image: made from Debian bookworm ($(du -h "$tar" | cut -f1) unpacked)"
