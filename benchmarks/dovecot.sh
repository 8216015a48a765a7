# Dovecot for the benchmarks (sourced by compare.sh and postgres.sh): Debian's dovecot-pop3d, run as user
# `mail` in its high-performance login mode (`service pop3-login { service_count = 0 }`, one login process
# per CPU) with its auth cache on, reading the same passwd-file ({SCHEME}secret lines) as pop3d.

dovecot_install() {  # as root: install dovecot-pop3d if missing; stop the system instance, we run our own
  if ! command -v dovecot >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-pop3d >/dev/null
  fi
  (service dovecot stop || systemctl disable --now dovecot || true) >/dev/null 2>&1
  update-rc.d dovecot disable >/dev/null 2>&1 || true
}

dovecot_conf() {  # DIR PASSWD PORT [TLS_PORT CERT KEY]: writes DIR/dovecot.conf for the Maildirs DIR/mail/USER/Maildir
  local d=$1 passwd=$2 port=$3 tls_port=${4:-} cert=${5:-} key=${6:-}
  mkdir -p "$d/run" "$d/state"
  {
    echo "protocols = pop3"
    echo "listen = 127.0.0.1"
    echo "base_dir = $d/run"
    echo "state_dir = $d/state"
    echo "log_path = $d/dovecot.log"
    if [ -n "$tls_port" ]; then
      printf 'ssl = yes\nssl_cert = <%s\nssl_key = <%s\nssl_min_protocol = TLSv1.2\n' "$cert" "$key"
    else
      echo "ssl = no"
    fi
    cat <<EOC
disable_plaintext_auth = no
auth_cache_size = 10M
auth_cache_ttl = 1 hour
auth_mechanisms = plain
mail_location = maildir:$d/mail/%u/Maildir
first_valid_uid = 8
first_valid_gid = 8
default_process_limit = 20000
default_client_limit = 20000
default_vsz_limit = 1G
passdb {
  driver = passwd-file
  args = scheme=PLAIN $passwd
}
userdb {
  driver = static
  args = uid=mail gid=mail home=$d/mail/%u
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $port
  }
EOC
    if [ -n "$tls_port" ]; then
      printf '  inet_listener pop3s {\n    address = 127.0.0.1\n    port = %s\n    ssl = yes\n  }\n' "$tls_port"
    fi
    cat <<EOC
  service_count = 0
  process_min_avail = $(nproc)
}
service pop3 {
  process_limit = 20000
}
service auth {
  client_limit = 40000
}
EOC
  } > "$d/dovecot.conf"
  chmod o+r "$passwd"
}
