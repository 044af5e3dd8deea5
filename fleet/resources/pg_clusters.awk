# pg_lsclusters' cluster_info (postgresql-common's PgCommon.pm) without Perl: ARGV holds /etc/postgresql/V/C/postgresql.conf paths
# (sorted); prints `V C PORT STATUS DATADIR`, versions in numeric order, or `fallback` whenever
# something is not the plain Debian case this reads exactly (then pg_lsclusters itself is run).
function absp(p, parent) { if (p ~ /^\//) return p; sub(/\/[^\/]*$/, "", parent); return parent "/" p }
function unq(s,   out, i, c) {  # a quoted value: \x is x, '' is '
  out = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "\\" && i < length(s)) { i++; out = out substr(s, i, 1) }
    else if (c == "'" && substr(s, i + 1, 1) == "'") { i++; out = out "'" }
    else out = out c
  }
  return out
}
function readconf(path, auto, depth,   line, r, k, rest, v, d, n, a, i, m, c, quoted) {
  if (depth > 8) { bad = 1; return }
  while ((r = (getline line < path)) > 0) {
    sub(/\r$/, "", line)
    if (line ~ /^[ \t]*(#.*)?$/) continue
    if (match(line, /^[ \t]*[A-Za-z0-9_.-]+/) == 0) { bad = 1; break }
    k = substr(line, RSTART, RLENGTH); sub(/^[ \t]+/, "", k); rest = substr(line, RSTART + RLENGTH)
    if (rest !~ /^([ \t]*=[ \t]*|[ \t]+)/) { bad = 1; break }
    sub(/^[ \t]*=?[ \t]*/, "", rest)
    quoted = substr(rest, 1, 1) == "'"
    if (quoted) {
      # the quoted value ends at the first ' that is neither doubled nor escaped
      v = ""; m = 0
      for (i = 2; i <= length(rest); i++) {
        c = substr(rest, i, 1)
        if (c == "\\") { v = v c substr(rest, i + 1, 1); i++; continue }
        if (c == "'" && substr(rest, i + 1, 1) == "'") { v = v "''"; i++; continue }
        if (c == "'") { m = i; break }
        v = v c
      }
      if (!m || substr(rest, m + 1) !~ /^[ \t]*(#.*)?$/) { bad = 1; break }
      v = unq(v)
    } else {
      if (match(rest, /^-?[A-Za-z0-9][A-Za-z0-9._:\/+-]*/) == 0 || substr(rest, RLENGTH + 1) !~ /^[ \t]*(#.*)?$/) { bad = 1; break }
      v = substr(rest, 1, RLENGTH)
    }
    k = tolower(k)
    if (k == "include_dir" && quoted) {
      d = absp(v, path)
      if (d != confdir "/conf.d") { bad = 1; break }  # only conf.d's files were listed
      n = split(incl, a, " ")
      for (i = 1; i <= n; i++) if (index(a[i], d "/") == 1 && substr(a[i], length(d) + 2) !~ /^\.|\//) readconf(a[i], 0, depth + 1)
    } else if ((k == "include" || k == "include_if_exists") && quoted) readconf(absp(v, path), 0, depth + 1)
    else if (!auto || k != "data_directory") conf[k] = v
  }
  if (r < 0 && depth == 0 && !auto) bad = 1  # postgresql.conf unreadable: pg_lsclusters' other paths
  close(path)
}
function exists(f,   x, r) { r = (getline x < f); close(f); return r >= 0 }
BEGIN {
  for (j = 1; j < ARGC; j++) {
    path = ARGV[j]; confdir = path; sub(/\/postgresql\.conf$/, "", confdir)
    c = confdir; sub(/.*\//, "", c); v = confdir; sub(/\/[^\/]*$/, "", v); sub(/.*\//, "", v)
    if (v !~ /^[0-9]+\.?[0-9]+$/ || c !~ /^[A-Za-z0-9_.-]+$/) { bad = 1; break }
    split("", conf); readconf(path, 0, 0)
    data = conf["data_directory"]
    if (bad || data == "") { bad = 1; break }
    if (v + 0 >= 9.4) readconf(data "/postgresql.auto.conf", 1, 0)
    if (bad) break
    port = conf["port"]; if (port == "" || port == "0") port = 5432
    pidf = conf["external_pid_file"]
    if (pidf == "" || pidf == "(none)") { bad = 1; break }  # pg_lsclusters would probe the socket
    status = "down"; sup = ""
    if (exists(pidf)) {
      pid = ""; getline pid < pidf; close(pidf)
      if (pid !~ /^[0-9]+[ \t]*$/ || pid + 0 == 0) { bad = 1; break }
      pid += 0; cmd = ""
      if ((getline cmd < (proc "/" pid "/cmdline")) < 0) { bad = 1; break }  # not running: the socket decides
      close(proc "/" pid "/cmdline")
      if (cmd ~ /(^|[^A-Za-z0-9_])postgres([^A-Za-z0-9_]|$)/) status = "online"
      cg = ""
      while ((getline x < (proc "/" pid "/cgroup")) > 0) cg = cg x "\n"
      close(proc "/" pid "/cgroup")
      if (match(cg, /(^|[^A-Za-z0-9_])(pacemaker|patroni)([^A-Za-z0-9_]|$)/)) {
        sup = substr(cg, RSTART, RLENGTH); sub(/^[^a-z]/, "", sup); sub(/[^a-z]$/, "", sup)
      }
    }
    if (v + 0 >= 12 ? exists(data "/recovery.signal") || exists(data "/standby.signal") : exists(data "/recovery.conf"))
      status = status ",recovery"
    if (sup != "") status = status "," sup
    start = "auto"; sc = confdir "/start.conf"
    while ((getline x < sc) > 0) {
      sub(/#.*$/, "", x); sub(/^[ \t\r]+/, "", x); sub(/[ \t\r]+$/, "", x)
      if (x == "") continue
      if (x ~ /^(auto|manual|disabled)/) { start = substr(x, 1, x ~ /^manual/ ? 6 : x ~ /^auto/ ? 4 : 8); break }
      bad = 1; break
    }
    close(sc)
    if (bad || data ~ /[ \t]/) { bad = 1; break }
    out[++n_out] = v " " c " " port " " status "," start " " data; ver[n_out] = v + 0
  }
  if (bad) { print "fallback"; exit }
  for (i = 2; i <= n_out; i++)  # stable insertion sort by version, numerically (the glob sorted names)
    for (j = i; j > 1 && ver[j - 1] > ver[j]; j--) { t = out[j]; out[j] = out[j - 1]; out[j - 1] = t; t = ver[j]; ver[j] = ver[j - 1]; ver[j - 1] = t }
  for (i = 1; i <= n_out; i++) print out[i]
}
