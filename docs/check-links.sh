#!/usr/bin/env bash
# Checks every relative markdown link in README.md, docs/*.md, bench/README.md and bench/figures/*.md:
# the file exists, and a #anchor matches one of its headings (GitHub's slugs). Prints each bad link;
# exits 1 if there is one. Run from the repository root: docs/check-links.sh
cd "${1:-.}"
slug() { python3 -c 'import re,sys; t=sys.argv[1].strip().lower(); t=re.sub(r"[^\w\- ]","",t); print(t.replace(" ","-"))' "$1"; }
bad=$(for f in README.md docs/*.md bench/README.md bench/figures/*.md; do
  dir=$(dirname "$f")
  grep -o '\]([^)]*)' "$f" | sed 's/^](//; s/)$//' | while read -r l; do
    case "$l" in http*|mailto:*) continue;; esac
    path=${l%%#*}; anchor=""; [[ "$l" == *#* ]] && anchor=${l#*#}
    if [ -z "$path" ]; then target="$f"; else target="$dir/$path"; fi
    if [ ! -e "$target" ]; then
      echo "DEAD: $f -> $l"; continue
    fi
    if [ -n "$anchor" ]; then
      found=0
      while IFS= read -r h; do [ "$(slug "$h")" = "$anchor" ] && found=1 && break; done < <(grep '^#' "$target" | sed 's/^#* //')
      [ $found = 1 ] || echo "BAD ANCHOR: $f -> $l"
    fi
  done
done)
[ -z "$bad" ] || { echo "$bad"; exit 1; }
