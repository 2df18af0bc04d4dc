/* hsae feature browser: one run's latents, or several runs side by side.
 * Plain ES2017, no modules and no fetch: data files are scripts calling hsaeData(...),
 * so the page works opened from disk (file://) as well as from a static server.
 * State lives in the URL hash (#view=...&q=...&sort=...), so a view can be linked. */
(function () {
  "use strict";

  // ---- loading data files --------------------------------------------------------------
  var loaded = {};
  var pending = {};
  window.hsaeData = function (payload) {
    var script = document.currentScript;
    loaded[script ? script.src : ""] = payload;
  };
  function absolute(url) {
    var a = document.createElement("a");
    a.href = url;
    return a.href;
  }
  function load(url) {
    var key = absolute(url);
    if (!pending[key]) {
      pending[key] = new Promise(function (resolve, reject) {
        var s = document.createElement("script");
        s.src = url;
        s.onload = function () {
          if (key in loaded) resolve(loaded[key]);
          else reject(new Error("no data in " + url));
        };
        s.onerror = function () { reject(new Error("cannot load " + url)); };
        document.head.appendChild(s);
      });
    }
    return pending[key];
  }

  // ---- small helpers -------------------------------------------------------------------
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "text") e.textContent = attrs[k];
        else if (k === "cls") e.className = attrs[k];
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
        else e.setAttribute(k, attrs[k]);
      });
    }
    (children || []).forEach(function (c) {
      if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return Number(v).toPrecision(digits || 3);
  }
  function pct(v) {
    if (v === null || v === undefined) return "–";
    return (100 * v < 0.1 && v > 0 ? (100 * v).toPrecision(2) : (100 * v).toFixed(1)) + "%";
  }
  function pad5(i) { return ("0000" + i).slice(-5); }
  function colour(i) { return "hsl(" + ((i * 137.508) % 360).toFixed(0) + ",55%,45%)"; }
  function readHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      if (!part) return;
      var kv = part.split("=");
      out[decodeURIComponent(kv[0])] = decodeURIComponent((kv[1] || "").replace(/\+/g, " "));
    });
    return out;
  }
  function writeHash(state) {
    var parts = Object.keys(state).filter(function (k) {
      return state[k] !== "" && state[k] !== null && state[k] !== undefined;
    }).map(function (k) { return encodeURIComponent(k) + "=" + encodeURIComponent(state[k]); });
    var hash = "#" + parts.join("&");
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
  function fail(err) {
    var status = document.getElementById("status") || document.getElementById("app");
    status.className = "error";
    status.textContent = "Could not load the browser data: " + err.message;
    console.error(err);
  }

  // ---- one run's data ------------------------------------------------------------------
  function Run(base, payload) {
    this.base = base;
    this.meta = payload.meta;
    this.cols = payload.cols;
    this.n = payload.meta.n_latents;
  }
  Run.prototype.shard = function (k) {
    var size = this.meta.shard_size, i = Math.floor(k / size);
    return load(this.base + "data/latents-" + pad5(i) + ".js").then(function (items) {
      return items[k - i * size];
    });
  };
  Run.prototype.thumb = function (row) {
    return this.base + "thumbs/" + Math.floor(row / 1000) + "/" + row + "." + this.meta.thumbs;
  };
  Run.prototype.segs = function (row) {  // segment tokens: the image's segment map (base64 ids)
    return load(this.base + "segs/" + Math.floor(row / 1000) + "/" + row + ".js");
  };
  Run.prototype.hasHeat = function () { return !!(this.meta.grid || this.meta.segments); };
  Run.prototype.cls = function (level, c) {
    return c >= 0 ? this.meta.classes[level][c] : "–";
  };
  Run.prototype.value = function (key, k) {
    if (key === "id") return k;
    var col = this.cols[key];
    return col ? col[k] : null;
  };
  Run.prototype.name = function (k) {
    var i = this.cols.name[k];
    return i >= 0 ? this.meta.names[i] : "";
  };
  Run.prototype.sortKeys = function () {
    var keys = ["id", "purity", "adjusted", "density", "mean_act", "max_act", "n_fired", "depth"];
    this.meta.levels.forEach(function (lv) { keys.push("purity@" + lv); });
    if (this.meta.names.length) keys.push("name_score");
    if (this.cols.containment) keys.push("containment");
    return keys;
  };
  Run.prototype.matches = function (k, q) {
    if (!q) return true;
    var id = /^#?(\d+)$/.exec(q);
    if (id) return k === parseInt(id[1], 10);
    var needle = q.toLowerCase(), self = this;
    if (this.name(k).toLowerCase().indexOf(needle) >= 0) return true;
    return this.meta.levels.some(function (lv, l) {
      return self.cls(l, self.cols["top@" + lv][k]).toLowerCase().indexOf(needle) >= 0;
    });
  };
  Run.prototype.sorted = function (ids, key, asc) {
    var self = this;
    var values = {};
    ids.forEach(function (k) { values[k] = self.value(key, k); });
    return ids.slice().sort(function (a, b) {
      var va = values[a], vb = values[b];
      var na = va === null || va === undefined, nb = vb === null || vb === undefined;
      if (na || nb) return na === nb ? a - b : na ? 1 : -1;  // missing values last
      if (va === vb) return a - b;
      return asc ? va - vb : vb - va;
    });
  };

  // ---- a latent's card -----------------------------------------------------------------
  var HEAT_LUT = (function () {
    var lut = new Uint8ClampedArray(256 * 4);
    for (var v = 0; v < 256; v++) {
      var t = v / 255;
      lut[4 * v] = 255;
      lut[4 * v + 1] = Math.round(230 * (1 - t));
      lut[4 * v + 2] = 0;
      lut[4 * v + 3] = Math.round(165 * Math.pow(t, 1.2));  // weak cells stay see-through
    }
    return lut;
  })();

  function heatCanvas(b64, grid) {
    var bytes = atob(b64), h = grid[0], w = grid[1];
    var canvas = el("canvas", { width: w, height: h, cls: "heat" });
    var ctx = canvas.getContext("2d");
    var image = ctx.createImageData(w, h);
    for (var i = 0; i < h * w; i++) {
      var v = bytes.charCodeAt(i);
      image.data.set(HEAT_LUT.subarray(4 * v, 4 * v + 4), 4 * i);
    }
    ctx.putImageData(image, 0, 0);
    return canvas;
  }

  // Segment tokens: each cell of the stem grid painted with the heat of its segment's token.
  function paintSegments(canvas, seg, heatB64, idsB64) {
    var heat = atob(heatB64), ids = atob(idsB64), h = seg.grid[0], w = seg.grid[1];
    var ctx = canvas.getContext("2d");
    var image = ctx.createImageData(w, h);
    for (var i = 0; i < h * w; i++) {
      var id = seg.bytes === 1 ? ids.charCodeAt(i) : ids.charCodeAt(2 * i) | (ids.charCodeAt(2 * i + 1) << 8);
      var v = id < heat.length ? heat.charCodeAt(id) : 0;  // past the tokens: no token there
      image.data.set(HEAT_LUT.subarray(4 * v, 4 * v + 4), 4 * i);
    }
    ctx.putImageData(image, 0, 0);
    canvas.setAttribute("data-painted", "1");
  }
  function segmentCanvas(run, row, heatB64, img) {
    var seg = run.meta.segments;
    var canvas = el("canvas", { width: seg.grid[1], height: seg.grid[0], cls: "heat" });
    function paint() {
      run.segs(row).then(function (ids) { paintSegments(canvas, seg, heatB64, ids); }).catch(fail);
    }
    // With a thumbnail, its map loads when the (lazy) image does: only cards on screen.
    if (img && !img.complete) img.addEventListener("load", paint, { once: true });
    else paint();
    return canvas;
  }

  function card(run, k, opts) {
    opts = opts || {};
    var meta = run.meta, cols = run.cols, level = cols.level[k];
    var head = el("header", null, [
      el("a", { cls: "lid", href: "#q=%23" + k, title: "show this latent" }, ["#" + k]),
    ]);
    var name = run.name(k);
    if (name) {
      head.appendChild(el("span", { cls: "name", title: "automatic name (cosine score)" }, [name]));
      head.appendChild(el("span", { cls: "badge" }, ["score " + fmt(cols.name_score[k])]));
    }
    if (level >= 0) {
      var top = run.cls(level, cols["top@" + meta.levels[level]][k]);
      head.appendChild(el("span", { cls: "badge level", title: "purest level: top class, purity of the top images" },
        ["purest: " + meta.levels[level] + " · " + top + " · " + fmt(cols.purity[k], 2)]));
    } else {
      head.appendChild(el("span", { cls: "badge unscored" },
        [cols.n_fired[k] ? "fires on too few images to score" : "never fires"]));
    }
    if (opts.containment) {
      head.appendChild(el("span", { cls: "badge", title: "share of this latent's images on which the container fires" },
        ["⊂ #" + cols.contain_parent[k] + " · " + fmt(cols.containment[k], 3)]));
    }
    var stats = [
      "density " + pct(cols.density[k]),
      "mean act " + fmt(cols.mean_act[k]),
      "max " + fmt(cols.max_act[k]),
      "fires on " + fmt(cols.n_fired[k]) + " images",
    ];
    var extra = [];
    var st = meta.structure;
    if (st && st.kind === "matryoshka" && cols.group[k] >= 0) {
      var g = st.groups[cols.group[k]];
      extra.push(el("span", null, [" · Matryoshka group " + cols.group[k] + " (latents " + g[0] + "–" + (g[1] - 1) + ")"]));
    }
    if (st && st.kind === "hierarchical") {
      if (k < st.n_parents) {
        extra.push(" · H-SAE parent of ");
        for (var c = 0; c < st.n_children; c++) {
          var child = st.n_parents + k * st.n_children + c;
          extra.push(el("a", { href: "#q=%23" + child }, ["#" + child]), " ");
        }
      } else {
        extra.push(" · H-SAE child of ", el("a", { href: "#q=%23" + cols.group[k] }, ["#" + cols.group[k]]));
      }
    }
    if (cols.contain_parent && cols.contain_parent[k] >= 0 && !opts.containment) {
      extra.push(" · fires ⊂ ", el("a", { href: "#q=%23" + cols.contain_parent[k] }, ["#" + cols.contain_parent[k]]),
        " (" + fmt(cols.containment[k], 3) + ")");
    }
    var statsLine = el("div", { cls: "stats" }, [stats.join(" · ")].concat(extra));
    var dist = el("div", { cls: "dist" });
    var thumbs = el("div", { cls: "thumbs" });
    var box = el("article", { cls: "latent", "data-latent": k }, [head, statsLine, dist, thumbs]);
    run.shard(k).then(function (item) { fillCard(run, k, item, dist, thumbs); }).catch(fail);
    return box;
  }

  function fillCard(run, k, item, dist, thumbs) {
    var meta = run.meta;
    meta.levels.forEach(function (lv, l) {
      var bar = el("div", { cls: "bar" });
      var parts = item.dist[l] || [];
      var title = parts.map(function (p) { return run.cls(l, p[0]) + " " + p[1] + "/" + item.nt; }).join(", ");
      parts.forEach(function (p) {
        var share = item.nt ? p[1] / item.nt : 0;
        bar.appendChild(el("span", { style: "width:" + (100 * share).toFixed(1) + "%;background:" + colour(p[0] + 7 * l) },
          [run.cls(l, p[0]) + " " + Math.round(100 * share) + "%"]));
      });
      bar.title = title ? "top " + item.nt + " images: " + title : "no images";
      dist.appendChild(el("div", { cls: "lv", title: "purity " + fmt(run.cols["purity@" + lv][k], 3) }, [lv]));
      dist.appendChild(bar);
    });
    if (!item.img.length) {
      thumbs.appendChild(el("div", { cls: "noimg" }, ["no images: this latent never fires"]));
      return;
    }
    var finest = meta.levels.length - 1;
    item.img.forEach(function (row, s) {
      var label = run.cls(finest, item.lab[s]);
      var frame = el("div", { cls: "thumb" });
      var img = null;
      if (meta.thumbs) {
        img = el("img", { src: run.thumb(row), loading: "lazy", alt: "image " + row,
          title: "image " + row + ": " + label + ", activation " + fmt(item.act[s]) });
        frame.appendChild(img);
      } else {
        frame.appendChild(el("div", { cls: "noimg" }, ["image " + row]));
      }
      if (item.heat && meta.grid) frame.appendChild(heatCanvas(item.heat[s], meta.grid));
      else if (item.heat && meta.segments) frame.appendChild(segmentCanvas(run, row, item.heat[s], img));
      thumbs.appendChild(el("figure", null, [frame, el("figcaption", null, [fmt(item.act[s]) + " · " + label])]));
    });
  }

  // ---- one run's page ------------------------------------------------------------------
  var PER_PAGE = { flat: 24, tree: 8 };
  var MAX_MEMBERS = 6;  // member cards per unit (children, contained latents)

  function header(run) {
    var meta = run.meta, info = meta.info || {};
    document.title = meta.title + " · hsae feature browser";
    document.getElementById("title").textContent = meta.title;
    var bits = [];
    if (info.backbone) bits.push(info.backbone + (info.layer != null ? " layer " + info.layer : ""));
    if (info.tokens) bits.push(info.tokens + " tokens");
    if (info.arch) bits.push(info.arch + " SAE");
    bits.push(fmt(meta.n_latents) + " latents");
    bits.push(fmt(meta.n_images) + " images" + (info.split ? " (" + info.split + ")" : ""));
    var infoEl = document.getElementById("info");
    infoEl.textContent = bits.join(" · ");
    if (info.heatmaps) infoEl.appendChild(el("div", { cls: "heatnote" }, ["heatmaps: " + info.heatmaps]));
    var keys = Object.keys(meta.metrics || {});
    if (keys.length) {
      var table = el("table");
      keys.forEach(function (key) {
        table.appendChild(el("tr", null, [el("td", null, [key]), el("td", null, [fmt(meta.metrics[key], 4)])]));
      });
      infoEl.appendChild(el("details", null, [el("summary", null, ["eval.json metrics"]), table]));
    }
  }

  function RunPage(run) {
    this.run = run;
    this.state = stateFromHash(readHash());
    header(run);
    this.build();
    this.render();
    var self = this;
    window.addEventListener("hashchange", function () {  // a link such as #q=%23123
      self.state = stateFromHash(readHash());
      self.sync();
      self.render();
    });
  }

  function stateFromHash(h) {
    return {
      view: h.view || "all", q: h.q || "", sort: h.sort || "id",
      order: h.order || (h.sort && h.sort !== "id" ? "desc" : "asc"),
      page: parseInt(h.page || "0", 10), sel: h.sel || "", thr: h.thr || "0.9", heat: h.heat || "1",
    };
  }

  RunPage.prototype.views = function () {
    var st = this.run.meta.structure, views = [["all", "All latents"], ["level", "By purest level"]];
    if (st && st.kind === "matryoshka") views.push(["structure", "By Matryoshka group"]);
    if (st && st.kind === "hierarchical") views.push(["structure", "H-SAE parents and children"]);
    if (this.run.cols.containment) views.push(["contain", "By co-activation (A ⊂ B)"]);
    return views;
  };

  RunPage.prototype.build = function () {
    var self = this, run = this.run, app = document.getElementById("app");
    app.textContent = "";
    this.tabs = el("div", { cls: "tabs" });
    this.views().forEach(function (v) {
      self.tabs.appendChild(el("button", { "data-view": v[0], onclick: function () {
        self.set({ view: v[0], sel: "", page: 0 });
      } }, [v[1]]));
    });
    this.search = el("input", { type: "search", id: "search", placeholder: "class name, latent name or #id", value: this.state.q });
    this.search.addEventListener("input", function () { self.set({ q: self.search.value.trim(), page: 0 }); });
    this.sortSel = el("select", { id: "sort", title: "sort by" });
    run.sortKeys().forEach(function (key) { self.sortSel.appendChild(el("option", { value: key }, [key])); });
    this.sortSel.addEventListener("change", function () {
      self.set({ sort: self.sortSel.value, order: self.sortSel.value === "id" ? "asc" : "desc", page: 0 });
    });
    this.orderBtn = el("button", { id: "order", title: "ascending / descending", onclick: function () {
      self.set({ order: self.state.order === "asc" ? "desc" : "asc", page: 0 });
    } });
    this.heatBox = el("input", { type: "checkbox", id: "heat" });
    this.heatBox.addEventListener("change", function () { self.set({ heat: self.heatBox.checked ? "1" : "0" }); });
    var heatLabel = run.hasHeat() ? el("label", null, [this.heatBox, " heatmaps"]) : null;
    this.count = el("span", { id: "count" });
    app.appendChild(this.tabs);
    app.appendChild(el("div", { cls: "toolbar" }, [this.search, el("label", null, ["sort ", this.sortSel]), this.orderBtn, heatLabel, this.count]));
    this.chips = el("div", { cls: "chips", id: "chips" });
    this.note = el("div", { cls: "note" });
    this.list = el("div", { id: "list" });
    this.pager = el("div", { cls: "pager" });
    app.appendChild(this.chips);
    app.appendChild(this.note);
    app.appendChild(this.list);
    app.appendChild(this.pager);
    this.sync();
  };

  RunPage.prototype.sync = function () {
    var s = this.state;
    if (document.activeElement !== this.search) this.search.value = s.q;
    this.sortSel.value = s.sort;
    this.orderBtn.textContent = s.order === "asc" ? "↑ ascending" : "↓ descending";
    this.heatBox.checked = s.heat !== "0";
    document.body.classList.toggle("noheat", s.heat === "0");
    Array.prototype.forEach.call(this.tabs.children, function (b) { b.classList.toggle("on", b.getAttribute("data-view") === s.view); });
  };

  RunPage.prototype.set = function (changes) {
    var self = this;
    Object.keys(changes).forEach(function (k) { self.state[k] = changes[k]; });
    writeHash(this.state);
    this.sync();
    this.render();
  };

  // Units: [head latent, member latents] shown together; a flat list has no members.
  RunPage.prototype.units = function () {
    var run = this.run, s = this.state, cols = run.cols, meta = run.meta, n = run.n, k, self = this;
    var all = [];
    for (k = 0; k < n; k++) all.push(k);
    var match = function (k) { return run.matches(k, s.q); };
    var chips = [], note = "", units;
    if (s.view === "level") {
      var counts = {};
      all.forEach(function (k) { counts[cols.level[k]] = (counts[cols.level[k]] || 0) + 1; });
      var sel = s.sel === "" ? "0" : s.sel;
      meta.levels.forEach(function (lv, l) { chips.push([String(l), lv, counts[l] || 0]); });
      chips.push(["-1", "unscored", counts[-1] || 0]);
      this.selected = sel;
      note = "Each latent under the level where its top images are purest (chance-adjusted; the finest level within 0.05 of the best).";
      units = run.sorted(all.filter(function (k) { return String(cols.level[k]) === sel && match(k); }), s.sort, s.order === "asc")
        .map(function (k) { return [k, []]; });
    } else if (s.view === "structure" && meta.structure && meta.structure.kind === "matryoshka") {
      var groups = meta.structure.groups, gsel = s.sel === "" ? "0" : s.sel;
      groups.forEach(function (g, i) { chips.push([String(i), "group " + i + ": " + g[0] + "–" + (g[1] - 1), g[1] - g[0]]); });
      this.selected = gsel;
      note = "Matryoshka groups: group 0 is the first prefix (the most general latents); each later group adds latents.";
      units = run.sorted(all.filter(function (k) { return String(cols.group[k]) === gsel && match(k); }), s.sort, s.order === "asc")
        .map(function (k) { return [k, []]; });
    } else if (s.view === "structure" && meta.structure && meta.structure.kind === "hierarchical") {
      var P = meta.structure.n_parents, C = meta.structure.n_children;
      note = "Each H-SAE parent with its " + C + " children (a child fires only where its parent fires).";
      var parents = [];
      for (k = 0; k < P; k++) {
        var kids = [];
        for (var c = 0; c < C; c++) kids.push(P + k * C + c);
        if (match(k) || kids.some(match)) parents.push(k);
      }
      units = run.sorted(parents, s.sort, s.order === "asc").map(function (p) {
        var kids = [];
        for (var c = 0; c < C; c++) kids.push(P + p * C + c);
        return [p, kids];
      });
    } else if (s.view === "contain") {
      var thr = parseFloat(s.thr), members = {};
      ["0.5", "0.8", "0.9", "0.95", "0.99"].forEach(function (t) { chips.push([t, "containment ≥ " + t, null]); });
      this.selected = s.thr;
      all.forEach(function (k) {
        var p = cols.contain_parent[k];
        if (p >= 0 && cols.containment[k] >= thr) (members[p] = members[p] || []).push(k);
      });
      var heads = Object.keys(members).map(Number).filter(function (h) { return match(h) || members[h].some(match); });
      heads.sort(function (a, b) { return members[b].length - members[a].length || a - b; });
      var info = meta.containment || {};
      note = "Containers, most contained latents first: latent A sits under B when B fires on at least " + thr +
        " of the images A fires on (B chosen to maximise P(B|A) − P(B)), over " + fmt(info.images) + " of " + fmt(info.of) + " images.";
      units = heads.map(function (h) {
        return [h, members[h].slice().sort(function (a, b) { return cols.containment[b] - cols.containment[a] || a - b; })];
      });
    } else {
      units = run.sorted(all.filter(match), s.sort, s.order === "asc").map(function (k) { return [k, []]; });
    }
    return { units: units, chips: chips, note: note, tree: s.view === "contain" || (s.view === "structure" && meta.structure && meta.structure.kind === "hierarchical") };
  };

  RunPage.prototype.render = function () {
    var self = this, run = this.run, s = this.state;
    var res = this.units();
    this.chips.textContent = "";
    res.chips.forEach(function (c) {
      var b = el("button", { "data-sel": c[0], onclick: function () {
        if (s.view === "contain") self.set({ thr: c[0], page: 0 }); else self.set({ sel: c[0], page: 0 });
      } }, [c[1] + " ", c[2] === null ? null : el("small", null, ["(" + fmt(c[2]) + ")"])]);
      if (c[0] === self.selected) b.classList.add("on");
      self.chips.appendChild(b);
    });
    this.note.textContent = res.note;
    var nLatents = res.units.reduce(function (acc, u) { return acc + 1 + u[1].length; }, 0);
    this.count.textContent = fmt(run.n) + " latents · " + fmt(nLatents) + " shown here";
    this.count.setAttribute("data-total", run.n);
    this.count.setAttribute("data-match", nLatents);
    var per = res.tree ? PER_PAGE.tree : PER_PAGE.flat;
    var pages = Math.max(1, Math.ceil(res.units.length / per));
    var page = Math.min(Math.max(0, s.page || 0), pages - 1);
    this.list.textContent = "";
    if (!res.units.length) this.list.appendChild(el("p", { cls: "empty" }, ["No latent matches."]));
    var containment = s.view === "contain";
    res.units.slice(page * per, (page + 1) * per).forEach(function (u) {
      var unit = el("div", { cls: "unit" }, [card(run, u[0])]);
      if (u[1].length) {
        // A broad container can hold thousands: the first few as cards, the rest as links.
        var members = el("div", { cls: "members" });
        u[1].slice(0, MAX_MEMBERS).forEach(function (m) { members.appendChild(card(run, m, { containment: containment })); });
        if (u[1].length > MAX_MEMBERS) {
          var more = el("div", { cls: "note more" }, ["and " + fmt(u[1].length - MAX_MEMBERS) + " more: "]);
          u[1].slice(MAX_MEMBERS, MAX_MEMBERS + 200).forEach(function (m) {
            more.appendChild(el("a", { href: "#q=%23" + m }, ["#" + m]));
            more.appendChild(document.createTextNode(" "));
          });
          if (u[1].length > MAX_MEMBERS + 200) more.appendChild(document.createTextNode("…"));
          members.appendChild(more);
        }
        unit.appendChild(members);
      }
      self.list.appendChild(unit);
    });
    this.pager.textContent = "";
    this.pager.appendChild(el("button", { id: "prev", onclick: function () { self.set({ page: page - 1 }); } }, ["‹ previous"]));
    this.pager.appendChild(el("span", { id: "pageinfo" }, ["page " + (page + 1) + " of " + pages]));
    this.pager.appendChild(el("button", { id: "next", onclick: function () { self.set({ page: page + 1 }); } }, ["next ›"]));
    this.pager.children[0].disabled = page === 0;
    this.pager.children[2].disabled = page >= pages - 1;
    document.body.setAttribute("data-ready", "1");
  };

  // ---- several runs side by side -------------------------------------------------------
  function ComparePage(spec) {
    var self = this;
    this.spec = spec;
    document.getElementById("title").textContent = "Side by side: " + spec.runs.map(function (r) { return r.label; }).join(" · ");
    document.title = "hsae comparison";
    var info = document.getElementById("info");
    info.textContent = "Each run's own browser: ";
    spec.runs.forEach(function (r, i) {
      info.appendChild(el("a", { href: r.dir + "/index.html" }, [r.label]));
      if (i < spec.runs.length - 1) info.appendChild(document.createTextNode(" · "));
    });
    Promise.all(spec.runs.map(function (r) {
      return load(r.dir + "/data/index.js").then(function (p) { return new Run(r.dir + "/", p); });
    })).then(function (runs) {
      self.runs = runs;
      self.build();
      self.render();
    }).catch(fail);
  }

  ComparePage.prototype.build = function () {
    var self = this, app = document.getElementById("app"), h = readHash(), first = this.runs[0];
    app.textContent = "";
    app.classList.add("compare");
    this.state = { a: h.a || "0", b: h.b || (this.runs.length > 1 ? "1" : "0"), level: h.level || "0", cls: h.cls || first.meta.classes[0][0] };
    function runSelect(id, key) {
      var sel = el("select", { id: id });
      self.spec.runs.forEach(function (r, i) { sel.appendChild(el("option", { value: String(i) }, [r.label])); });
      sel.value = self.state[key];
      sel.addEventListener("change", function () { self.state[key] = sel.value; self.render(); });
      return sel;
    }
    this.levelSel = el("select", { id: "level" });
    first.meta.levels.forEach(function (lv, l) { self.levelSel.appendChild(el("option", { value: String(l) }, [lv])); });
    this.levelSel.value = this.state.level;
    this.classInput = el("input", { type: "search", id: "class", list: "classes", value: this.state.cls, placeholder: "class name" });
    this.datalist = el("datalist", { id: "classes" });
    this.levelSel.addEventListener("change", function () {
      self.state.level = self.levelSel.value;
      self.state.cls = first.meta.classes[+self.state.level][0];
      self.classInput.value = self.state.cls;
      self.render();
    });
    this.classInput.addEventListener("change", function () { self.state.cls = self.classInput.value.trim(); self.render(); });
    app.appendChild(el("div", { cls: "toolbar" }, [
      el("label", null, ["left ", runSelect("run-a", "a")]), el("label", null, ["right ", runSelect("run-b", "b")]),
      el("label", null, ["level ", this.levelSel]), el("label", null, ["class ", this.classInput]), this.datalist,
    ]));
    this.summary = el("div");
    this.cols = el("div", { cls: "cols" });
    app.appendChild(this.summary);
    app.appendChild(this.cols);
  };

  ComparePage.prototype.latentsFor = function (run, level, name) {
    var lv = run.meta.levels[level], c = run.meta.classes[level] ? run.meta.classes[level].indexOf(name) : -1;
    if (c < 0 || lv === undefined) return [];
    var top = run.cols["top@" + lv], purity = run.cols["purity@" + lv], out = [];
    for (var k = 0; k < run.n; k++) if (top[k] === c && purity[k] !== null) out.push(k);
    return out.sort(function (a, b) { return purity[b] - purity[a] || run.cols.n_fired[b] - run.cols.n_fired[a]; });
  };

  ComparePage.prototype.render = function () {
    var self = this, s = this.state, level = +s.level;
    writeHash(s);
    this.datalist.textContent = "";
    this.runs[0].meta.classes[level].forEach(function (c) { self.datalist.appendChild(el("option", { value: c })); });
    var table = el("table", { cls: "summary" }, [el("tr", null, [el("th", null, ["run"]), el("th", null, ["latents whose top class is " + s.cls]),
      el("th", null, ["with purity ≥ 0.8"]), el("th", null, ["best purity"]), el("th", null, [""])])]);
    this.runs.forEach(function (run, i) {
      var ks = self.latentsFor(run, level, s.cls), lv = run.meta.levels[level];
      var pure = ks.filter(function (k) { return run.cols["purity@" + lv][k] >= 0.8; }).length;
      table.appendChild(el("tr", null, [el("td", null, [self.spec.runs[i].label]), el("td", null, [fmt(ks.length)]), el("td", null, [fmt(pure)]),
        el("td", null, [ks.length ? fmt(run.cols["purity@" + lv][ks[0]], 3) : "–"]),
        el("td", null, [el("a", { href: run.base + "index.html#q=" + encodeURIComponent(s.cls) + "&sort=purity%40" + encodeURIComponent(lv) + "&order=desc" }, ["browse"])])]));
    });
    this.summary.textContent = "";
    this.summary.appendChild(table);
    this.cols.textContent = "";
    [s.a, s.b].forEach(function (i) {
      var run = self.runs[+i], ks = self.latentsFor(run, level, s.cls).slice(0, 6);
      var col = el("div", { cls: "col", "data-run": self.spec.runs[+i].label }, [el("h2", null, [self.spec.runs[+i].label + ": latents for " + s.cls + " (" + run.meta.levels[level] + ")"])]);
      if (!ks.length) col.appendChild(el("p", { cls: "empty" }, ["No latent of this run has " + s.cls + " as its top class."]));
      ks.forEach(function (k) { col.appendChild(card(run, k)); });
      self.cols.appendChild(col);
    });
    document.body.setAttribute("data-ready", "1");
  };

  // ---- start ---------------------------------------------------------------------------
  load("data/index.js").then(function (payload) {
    if (payload.compare) new ComparePage(payload.compare);
    else new RunPage(new Run("", payload));
  }).catch(fail);
})();
