#!/usr/bin/env bash
# Install WordNet 3.0 for nltk from Debian packages (nltk.download needs network access
# that is not available here).
#
#   bash tools/install_wordnet.sh            # into ${NLTK_DATA:-~/nltk_data}/corpora/wordnet
#   NLTK_DATA=/opt/nltk_data bash tools/install_wordnet.sh
#
# Idempotent: re-running it re-copies the same files. Debian ships the database files
# but not the `lexnames` table nltk's reader needs, so it is written from the table in
# the lexnames(5WN) man page (or, if man pages are excluded from the image, from the same
# table embedded below).
set -euo pipefail

target="${NLTK_DATA:-$HOME/nltk_data}/corpora/wordnet"
src=/usr/share/wordnet
manpage=/usr/share/man/man5/lexnames.5WN.gz

if [[ ! -f "$src/data.noun" || ! -f "$src/index.sense" ]]; then
  if [[ "$(id -u)" == 0 ]]; then sudo=""; else sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
    || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index; }
fi

for f in data.noun index.noun index.sense cntlist.rev; do
  [[ -f "$src/$f" ]] || { echo "install_wordnet.sh: $src/$f missing after apt install" >&2; exit 1; }
done

mkdir -p "$target"
tmp="$(mktemp -d "$target/.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Lines `NN<TAB>lexname<TAB>category` with category 1 noun, 2 verb, 3 adjective, 4 adverb,
# as nltk's WordNetCorpusReader parses them (it asserts NN equals the line number).
category_awk='
  $1 ~ /^[0-9][0-9]$/ && $2 ~ /^(adj|adv|noun|verb)\./ {
    split($2, part, "."); cat = (part[1] == "noun") ? 1 : (part[1] == "verb") ? 2 : (part[1] == "adj") ? 3 : 4;
    printf "%s\t%s\t%d\n", $1, $2, cat
  }'
if [[ -f "$manpage" ]]; then
  zcat "$manpage" | awk -F'\t' '{gsub(/ +$/, "", $2); print}' OFS='\t' | awk -F'\t' "$category_awk" > "$tmp/lexnames"
else
  # The table of lexnames(5WN), WordNet 3.0.
  awk -F'\t' "$category_awk" > "$tmp/lexnames" <<'EOF'
00	adj.all
01	adj.pert
02	adv.all
03	noun.Tops
04	noun.act
05	noun.animal
06	noun.artifact
07	noun.attribute
08	noun.body
09	noun.cognition
10	noun.communication
11	noun.event
12	noun.feeling
13	noun.food
14	noun.group
15	noun.location
16	noun.motive
17	noun.object
18	noun.person
19	noun.phenomenon
20	noun.plant
21	noun.possession
22	noun.process
23	noun.quantity
24	noun.relation
25	noun.shape
26	noun.state
27	noun.substance
28	noun.time
29	verb.body
30	verb.change
31	verb.cognition
32	verb.communication
33	verb.competition
34	verb.consumption
35	verb.contact
36	verb.creation
37	verb.emotion
38	verb.motion
39	verb.perception
40	verb.possession
41	verb.social
42	verb.stative
43	verb.weather
44	adj.ppl
EOF
fi

n="$(wc -l < "$tmp/lexnames")"
if [[ "$n" != 45 ]] || ! awk -F'\t' '$1 + 0 != NR - 1 { exit 1 }' "$tmp/lexnames"; then
  echo "install_wordnet.sh: expected 45 lexnames numbered 00..44, got $n lines in $tmp/lexnames" >&2
  exit 1
fi

cp "$src"/* "$tmp"/
chmod 644 "$tmp"/*
for f in "$tmp"/*; do mv -f "$f" "$target/"; done

python3 - "$target" <<'EOF'
import sys
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.data import FileSystemPathPointer

wn = WordNetCorpusReader(FileSystemPathPointer(sys.argv[1]), None)
synset = wn.synset("dog.n.01")
assert synset.lexname() == "noun.animal", synset.lexname()
print(f"install_wordnet.sh: WordNet {wn.get_version()} ready at {sys.argv[1]} "
      f"({sum(1 for _ in wn.all_synsets('n'))} noun synsets)")
EOF
